"""`edge-rwkv bench`: speed and memory of our runtime beside the official `rwkv` package, one table.

    edge-rwkv bench --preset 1.5b --device cuda [--precisions fp16,int8,int4] [--batch 1,8,64,256]
                    [--batch-precisions fp16,int4] [--memory-precisions fp16,int4]
                    [--prefill 1024,8192,32768] [--memory-ctx 8192,32768,131072] [--json o.json] [--plot o.png]

Both runtimes read the same weights: random weights in the official x070 layout (or MODEL), written
once as `<tmp>/model.pth`. Ours runs in this process through the runtime: its captured decode step (batch 1
and batched) on CUDA, the eager forward on CPU; chunked prefill through Runner.prefill; and end to end,
`Model.stream` greedy and top_p 0.8 (the peer: its PIPELINE.generate). The peer
(`rwkv` pip package, strategy "cuda fp16" / "cpu fp32") reads its configuration from environment
variables when imported, so it runs in a subprocess of its own (`python -m edge_rwkv.bench.peer`); on
CUDA it first tries its nvcc-built op (RWKV_CUDA_ON=1) and, if that build fails, runs again without
it — the table says which.

Precisions: the first float one of --precisions is the base (what the peer is compared with). Each
precision's model is made once and measured alone on the device (the one before it freed): decode B=1
for --precisions, batched decode for --batch-precisions, prefill + peak memory at --memory-ctx for
--memory-precisions (the base's prefill rows also cover --prefill). int8 / int4 models are quantized
as a memory-constrained deployment stores them (layers and head at that width, the embedding int8;
round to nearest, on the model's device), written as an artifact and loaded from it.

Timing: CUDA events after warm-up, median of many runs (CPU: time.perf_counter, median).
Memory: torch.cuda.max_memory_reserved after emptying the cache (CUDA, whole process: that model's weights
and any CUDA-graph pools included); on CPU the peak growth of heap bytes in use during the prefill, sampled
(glibc mallinfo2; RSS elsewhere): activations and state, not weights.
Bandwidth: bytes of weights (and state) read per decode step / step time, against a device copy
(CUDA) or a large memcpy (CPU) measured in the same run.

The package sits beside the runtime and depends on it, never the other way round:
    timing.py   timers (CUDA events / perf_counter, a captured CUDA graph), copy bandwidth
    memory.py   peak memory while a block runs; bytes of weights held and read per decode step
    options.py  BenchOptions, precisions and their order
    weights.py  random weights and tokens, the model file both runtimes read, each precision's model
    ours.py     our runtime: decode step, Model.stream, chunked prefill
    peer.py     the rwkv package in a subprocess
    run.py      one run: every precision's rows, the peer's beside them
    table.py    the table, the plot, the JSON
    cli.py      `edge-rwkv bench`
Benchmark scripts under benchmarks/ use timing.py, memory.py and weights.py.
"""
