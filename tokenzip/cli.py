"""The `tokenzip` command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Visual-token compression for HF VLMs.")
console = Console()


@app.command("policies")
def policies() -> None:
    """List the registered policies."""
    from .policies import list_policies

    table = Table("policy", "description")
    for name, description in list_policies().items():
        table.add_row(name, description)
    console.print(table)


@app.command("demo")
def demo(
    family: str = typer.Option("llava", help="tiny model family: llava, qwen2_5_vl or llava_onevision"),
    keep: float = typer.Option(0.25, help="fraction of visual tokens to keep (layer-averaged budget)"),
    new_tokens: int = typer.Option(8, help="tokens to generate"),
) -> None:
    """Run every baseline policy on a tiny offline model and show what each one did.

    The tiny model has random weights (no download): the generated tokens are meaningless, the token counts and
    the check that cached generation equals a cache-free recomputation ("cache ok") are not.
    """
    import torch

    from .api import apply
    from .testing.reference import cached_greedy, uncached_logits
    from .testing.tiny import FACTORIES, dummy_image, tiny

    if family not in FACTORIES:
        raise typer.BadParameter(f"unknown family {family!r}; choose one of {sorted(FACTORIES)}")
    vlm = tiny(family)
    inputs = vlm.inputs([dummy_image(112, 112, 0)], vlm.prompt("What is in the image ?"))
    table = Table(
        "policy",
        "keep",
        "visual",
        "into LLM",
        "layer avg",
        "select ms",
        "cache ok",
        "first tokens",
        title=f"tokenzip demo on a tiny random {family} (offline)",
    )
    base, _ = cached_greedy(vlm.model, inputs, new_tokens)
    table.add_row("(unpatched)", "-", "-", "-", "-", "-", "-", " ".join(map(str, base[0, :4].tolist())))
    for name, options in [("none", {}), ("random", {}), ("pool", {}), ("fastv", {})]:
        with apply(vlm.model, name, keep, **options) as patch:
            tokens, logits = cached_greedy(vlm.model, inputs, new_tokens)
            with patch.replay():
                reference = uncached_logits(vlm.model, inputs, tokens)
            record = patch.stats.history[0]
        sample = record.samples[0]
        selection = sum(v for k, v in record.seconds.items() if k != "vision") * 1e3
        same = bool(torch.allclose(logits, reference, atol=1e-4))
        table.add_row(
            name,
            str(keep),
            str(sample.visual_in),
            str(sum(it.kept for it in sample.items)),
            f"{sample.visual_mean:.1f}",
            f"{selection:.2f}",
            "yes" if same else "NO",
            " ".join(map(str, tokens[0, :4].tolist())),
        )
    console.print(table)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
