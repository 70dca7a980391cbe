"""The probe engine: real training steps that measure memory and throughput (docs/design.md).

Imports torch, numpy, the standard library and `models` only (import-linter checks it), so it runs on
a bare GPU box. This package's top level imports nothing heavy: the service process uses only `spec`
and `sandbox` (torch-free), while the probe itself runs in a child process
(`python -m service.probing.runner`).

Modules:
    spec        ProbeSpec (the job), ProbeError(code, message), PROBE_VERSION
    sandbox     run_probe_subprocess(spec, on_event, timeout_s, should_cancel) -> result dict; the one
                place probe and dry-run processes are started (sandboxed, with a standby)
    runner      the child's entry point (JSON in on stdin, JSON lines out)
    engine      run_probe(spec, emit) -> result dict (in-process; what the runner calls)
    search      search_max_batch_size(measure, budget, cap) -> SearchResult (pure, no torch)
    memory      CPUMemoryBudget (live-bytes tracker + OOM guard), is_oom, CUDA measurement, budgets
    step        TrainingStep: one real training step with optimizer state and precision handling
    throughput  throughput_ladder, measure_throughput
    noise       the gradient noise scale B_simple (two-batch-size estimators, Adam preconditioning)
    races       short training races from one initialisation: B_noise fitted from steps to a loss
    recipe      the recommendation: batch size, micro-batch, accumulation, learning rate, warm-up
    data        real data for the statistics: a client's sample or a built-in one (builtin/)
    sample_check  one validator of a sample against the model's loss (shapes, dtypes, a dry step)
    exported    bring your own model: a torch.export archive inspected, loaded without pickle, trained
"""

from service.probing.sandbox import run_probe_subprocess
from service.probing.spec import PROBE_VERSION, ProbeError, ProbeSpec

__all__ = ["PROBE_VERSION", "ProbeError", "ProbeSpec", "run_probe_subprocess"]
