"""Why the collection's device-placement patches (P4-P8) are off by default: the evidence."""

NOT_REPRODUCED = (
    "Not reproduced: in 63 training runs of a tiny Gemma 4 on an H100 and on 2 x H200 (BF16, INT8 "
    "and NF4; multimodal and text models; reentrant, non-reentrant and no gradient "
    "checkpointing; layers on 'cpu' next to cuda:0, on cuda:0 + cuda:1 + 'cpu', on 'disk', "
    "and placed by device_map='auto' with a memory budget as the collection did, with its "
    "recipe of prepare_model_for_kbit_training, LoRA r=16 on all linear layers and text-only "
    "batches, on transformers 5.5.4 / peft 0.19.1 / accelerate 1.13.0 and on 5.17.0 / 0.21.0 "
    "/ 1.15.0) no device-mismatch error occurred (validation/explorations/device_placement.md). "
    "Code reading agrees: accelerate's AlignDevicesHook sends every argument of a dispatched "
    "decoder layer (position embeddings, masks, position ids) to its execution device, moves "
    "its buffers (layer_scalar) there, and runs offloaded layers' weights there, so results "
    "and LoRA outputs share a device. The failures the auto-placed runs did hit were others, "
    "now fixed by P2, P14 and P16. Kept for users of the collection, off by default."
)
