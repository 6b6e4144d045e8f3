"""One module per patch. Each defines a module-level `PATCH`; the registry finds them."""
