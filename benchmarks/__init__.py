"""ldm-rt against the pipelines users would pick instead (`python benchmarks/run.py`; see benchmarks/README.md).

Not part of the installed package: a source-checkout tool imported as the top-level package `benchmarks`, with
the repository root on sys.path (run.py puts it there; so do the tests that import it). It may import
ldm_rt's runtime, reference and export; nothing of ldm_rt imports it (tests/test_layering.py).

    harness.py    what is measured (RunSpec, Peer, Workload) and the peer processes that measure it
    flops.py      the UNet's FLOPs per step and ONNX Runtime's profile of where its time goes
    machine.py    CPU, cores, versions, the matmul roofline, install footprints
    targets.py    issue 7's and issue 21's CPU targets against a report
    report.py     run_benchmark -> the report; its JSON, full tables and the README's performance section
    workloads.py  the models measured, made locally (SD-v1/v2-shaped, the shipped default model)
    diffusers_layout.py  an ldm-rt model folder as a diffusers folder, for diffusers and Optimum
    single_file.py       a diffusers folder as one original-layout checkpoint, for stable-diffusion.cpp
    peers/        one worker script per peer and their line protocol (worker_common.py), run as processes
"""
