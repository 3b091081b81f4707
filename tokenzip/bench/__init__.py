"""`tokenzip bench`: TTFT per stage, oracle overhead, decode speed, memory and FLOPs of policies side by side.

from tokenzip.bench import BenchSettings, Workload, load_model, run_bench
bm = load_model("llava-onevision-qwen2-0.5b", random_weights=True, text_layers=8)
result = run_bench(bm, Workload(images=1, image_size=(384, 384)), BenchSettings(["hiprune"], [0.111]))
"""

from .models import BenchModel, BenchSetupError, Workload, load_model
from .runner import BenchResult, BenchRow, BenchSettings, run_bench

__all__ = [
    "BenchModel",
    "BenchResult",
    "BenchRow",
    "BenchSettings",
    "BenchSetupError",
    "Workload",
    "load_model",
    "run_bench",
]
