"""Tools built on the compiler: tiny models, the VQA set and model, bench, speed, demo,
visualize, FLOPs / KV accounting, instrumentation, VTW calibration."""
