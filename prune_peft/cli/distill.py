"""Self-data distillation (SDFT): the unpruned teacher rewrites an SFT set's responses (cached, resumable).

The output folder (written atomically) holds the distilled dataset (``datasets.load_from_disk``) and
distill_stats.json. Generation streams into a cache folder, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._common import check_data_spec, check_positive, print_json


@dataclass
class DistillOptions:
    teacher: str = field(
        default="smollm2-135m", metadata={"help": "Hub id, local path, or embedded alias (smollm2-135m)."}
    )
    dataset: str = field(
        default="arithmetic", metadata={"help": "'arithmetic', 'shakespeare' or a save_to_disk folder."}
    )
    n: int | None = field(default=None, metadata={"help": "Use the first N rows (arithmetic: generate N problems)."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the generated datasets."})
    template: Literal["general", "general_refer", "math"] = field(
        default="general", metadata={"help": "SDFT rewrite prompt: general, general_refer or math."}
    )
    filter: Literal["general", "math", "none"] | None = field(
        default=None, metadata={"help": "Acceptance filter of the rewrites; default: by template."}
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per generation batch."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest rewrite, in tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling probability mass."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k sampling."})
    seed: int = field(default=0, metadata={"help": "Generation seed (per batch, so a resumed run matches)."})
    backend: Literal["transformers", "vllm"] = field(
        default="transformers", metadata={"help": "Generation engine: transformers or vllm."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Resumable generation cache; default: a hidden .<out>.cache next to --out."}
    )
    out: str | None = field(default=None, metadata={"help": "Output folder (required)."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace --out, and a cache made with another configuration."}
    )


def option_types(argv: list[str], config: dict[str, Any]) -> tuple[type, ...]:
    return (DistillOptions,)


def distill_dataset(spec: str, n: int | None, seed: int):
    """'arithmetic' / 'shakespeare' → generated offline SFT data; otherwise a ``save_to_disk`` folder."""
    from .. import sft_data

    if spec == "arithmetic":
        return sft_data.arithmetic_problems(n or 1000, seed=seed)
    if spec == "shakespeare":
        return sft_data.shakespeare_continuations("train", n=n, seed=seed)
    from datasets import load_from_disk

    ds = load_from_disk(spec)
    return ds.select(range(min(n, len(ds)))) if n else ds


def check_sampling(opts: DistillOptions) -> None:
    """Sampling settings: valid ranges, and only with --do-sample (greedy decoding would ignore them silently)."""
    from ._common import UsageError

    if opts.temperature is not None and not opts.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {opts.temperature!r}")
    if opts.top_p is not None and not 0 < opts.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {opts.top_p!r}")
    if opts.top_k is not None:
        check_positive({"--top-k": opts.top_k})
    given = [
        f
        for f, v in (("--temperature", opts.temperature), ("--top-p", opts.top_p), ("--top-k", opts.top_k))
        if v is not None
    ]
    if given and not opts.do_sample:
        raise UsageError(
            f"{', '.join(given)} only apply to sampling: add --do-sample, or drop them for greedy decoding"
        )


def run(opts: DistillOptions) -> int:
    from .._io import atomic_dir, atomic_write_json, check_output_dir
    from ._common import UsageError

    # bad input fails before the teacher loads
    if opts.out is None:
        raise UsageError("--out is required (the folder the distilled dataset is saved to)")
    out = check_output_dir(opts.out, overwrite=opts.overwrite, name="--out")
    check_data_spec("--dataset", opts.dataset)
    if opts.n is not None:
        check_positive({"--n": opts.n})
    check_positive({"--batch-size": opts.batch_size, "--max-new-tokens": opts.max_new_tokens})
    check_sampling(opts)
    cache = Path(opts.cache_dir) if opts.cache_dir else out.parent / f".{out.name}.cache"
    if opts.cache_dir:  # an existing cache is fine (it is resumed); a file or an unwritable place is not
        check_output_dir(cache, overwrite=True, name="--cache-dir")
    if opts.backend == "vllm":
        from ..distill.generation import require_vllm

        try:
            require_vllm()
        except ImportError as exc:
            raise UsageError(f"--backend vllm: {exc}") from None

    from ..distill import distill_stats, self_distill
    from ..distill.self_distill import _resolve_columns
    from ..models import load_model_and_tokenizer

    dataset = distill_dataset(opts.dataset, opts.n, opts.data_seed)
    if len(dataset) == 0:
        raise UsageError(f"--dataset {opts.dataset!r} has no rows (with --n {opts.n})")
    try:  # the columns are known before the teacher loads
        _resolve_columns(list(dataset.column_names), None, None, None)
    except ValueError as exc:
        raise UsageError(f"--dataset {opts.dataset!r}: {exc}") from None
    teacher, tok = load_model_and_tokenizer(opts.teacher)
    gen = {"max_new_tokens": opts.max_new_tokens, "do_sample": opts.do_sample}
    gen.update({k: getattr(opts, k) for k in ("temperature", "top_p", "top_k") if getattr(opts, k) is not None})
    distilled = self_distill(
        teacher,
        tok,
        dataset,
        template=opts.template,
        cache_dir=cache,
        filter=opts.filter,
        batch_size=opts.batch_size,
        seed=opts.seed,
        backend=opts.backend,
        overwrite=opts.overwrite,
        **gen,
    )
    stats = {"teacher": opts.teacher, "dataset": opts.dataset, "template": opts.template, **distill_stats(distilled)}
    with atomic_dir(out, overwrite=opts.overwrite, name="--out") as tmp:
        distilled.save_to_disk(str(tmp))
        atomic_write_json(tmp / "distill_stats.json", stats)
    print_json(stats)
    return 0
