"""What is benchmarked: shapes (the benchmark models of docs/benchmarks.md, explicit N/D/V, presets), loss options,
and the inputs they define."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch

#: The benchmark models (docs/benchmarks.md): name -> (D, V).
MODELS = {
    "GPT-2": (768, 50257),
    "Llama-2-7B": (4096, 32000),
    "Llama-3-8B": (4096, 128256),
    "Qwen2.5-7B": (3584, 152064),
    "Gemma-2-2B": (2304, 256000),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IGNORE_INDEX = -100
#: Input sets rotated among timed runs, so that no run finds its inputs in cache ...
ROTATED_SETS = 3
#: ... unless one set is larger than any cache, where rotating only costs memory.
ROTATE_BELOW_BYTES = 256 << 20


@dataclass(frozen=True)
class Case:
    """One shape: ``N`` tokens, hidden size ``D``, vocabulary ``V``, dtype name."""

    n: int
    d: int
    v: int
    dtype: str
    model: Optional[str] = None

    @property
    def label(self) -> str:
        name = f"{self.model} " if self.model else ""
        return f"{name}N={self.n} D={self.d} V={self.v} {self.dtype}"

    @property
    def group(self) -> str:
        """The case without ``N``: one plot panel."""
        return f"{self.model or 'D=%d V=%d' % (self.d, self.v)} {self.dtype}"

    def flops(self, pass_: str) -> int:
        """Matmul FLOPs of one pass: 2NDV forward, 6NDV forward + backward."""
        return (6 if pass_ == "fwd-bwd" else 2) * self.n * self.d * self.v


@dataclass(frozen=True)
class Options:
    """Loss options of a run; ``filter_eps`` changes speed, not the loss; ``ignored`` is the
    share of targets set to ``IGNORE_INDEX`` (prompt tokens in SFT), which every
    implementation takes."""

    token_weights: bool = False
    entropy: float = 0.0
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    z_loss: float = 0.0
    filter_eps: Optional[float] = None
    ignored: float = 0.1

    def active(self) -> frozenset:
        """Names of the loss-defining options that are set."""
        defaults = Options()
        return frozenset(k for k, v in asdict(self).items()
                         if k not in ("filter_eps", "ignored") and v != getattr(defaults, k))

    def sftkey_kwargs(self, token_weights: Optional[torch.Tensor]) -> dict:
        """Keyword arguments of ``sftkey.linear_cross_entropy`` for these options."""
        return dict(token_weights=token_weights, entropy_weights=self.entropy or None,
                    label_smoothing=self.label_smoothing, softcap=self.softcap, z_loss=self.z_loss,
                    ignore_index=IGNORE_INDEX)


class Inputs(NamedTuple):
    x: torch.Tensor          # [N, D]
    w: torch.Tensor          # [V, D]
    y: torch.Tensor          # [N] int64, IGNORE_INDEX where ignored
    token_weights: Optional[torch.Tensor]  # [N] float32 or None


def make_inputs(case: Case, opts: Options, device: torch.device, seed: int) -> Inputs:
    """Deterministic inputs for ``seed``: logits of standard deviation about 2, a share
    ``opts.ignored`` of the targets ignored."""
    g = torch.Generator(device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.n, case.d, generator=g, device=device).to(dtype)
    w = (torch.randn(case.v, case.d, generator=g, device=device) * (2 / case.d ** 0.5)).to(dtype)
    y = torch.randint(0, case.v, (case.n,), generator=g, device=device)
    y[torch.rand(case.n, generator=g, device=device) < opts.ignored] = IGNORE_INDEX
    a = torch.rand(case.n, generator=g, device=device) if opts.token_weights else None
    return Inputs(x, w, y, a)


def input_sets(case: Case, opts: Options, device: torch.device) -> list:
    """The input sets a measurement rotates through; set 0 is the one verified."""
    set_bytes = (case.n + case.v) * case.d * DTYPES[case.dtype].itemsize
    count = ROTATED_SETS if set_bytes < ROTATE_BELOW_BYTES else 1
    return [make_inputs(case, opts, device, seed) for seed in range(count)]


def _cpu_default(dtype: str) -> list:
    return [Case(n, 512, 16384, dtype) for n in (512, 1024)]


def _cpu_large(dtype: str) -> list:
    return [Case(2048, 1024, 32768, "bf16"), Case(4096, 1024, 32768, "bf16"),
            Case(1024, 4096, 128256, "bf16"), Case(2048, 1024, 32768, "fp32")]


def _gpu(dtype: str) -> list:
    return [Case(n, d, v, dtype, model) for model, (d, v) in MODELS.items() for n in (4096, 8192, 16384)]


def _gpu_check(dtype: str) -> list:
    return [Case(n, *MODELS[model], dtype, model) for model in ("Llama-3-8B", "Gemma-2-2B") for n in (4096, 16384)]


#: Preset name -> cases for a dtype. ``cpu-default``: two small shapes, a minute or two on a
#: 2-core CPU; ``cpu-large``: D=1024, V=32768 at N=2048 and 4096, Llama-3-8B's head at N=1024
#: (bf16), and the first again in fp32 (fixed dtypes); ``gpu``: every benchmark model at
#: N=4096, 8192 and 16384; ``gpu-check``: Llama-3-8B and Gemma-2-2B at N=4096 and 16384
#: (``scripts/gpu-check.sh``).
PRESETS = {"cpu-default": _cpu_default, "cpu-large": _cpu_large, "gpu": _gpu, "gpu-check": _gpu_check}


def model_cases(name: str, ns: list, dtype: str) -> list:
    """The benchmark model ``name`` (case-insensitive) at each ``N`` in ``ns``."""
    found = {m.lower(): m for m in MODELS}.get(name.lower())
    if found is None:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    d, v = MODELS[found]
    return [Case(n, d, v, dtype, found) for n in ns]


def parse_shape(text: str, dtype: str) -> Case:
    """``"N,D,V"`` -> a case."""
    try:
        n, d, v = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--shape expects N,D,V (three integers), got {text!r}") from None
    return Case(n, d, v, dtype)
