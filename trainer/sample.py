"""Sample text from a committed checkpoint, in one process without a process group.

Used by `stanchion up` to show what the model learned, and usable on any checkpoint a run wrote.
"""

from __future__ import annotations

from pathlib import Path

from stanchion.sdk import manifest as mf


def load_model(ckpt_dir: str | Path):  # noqa: ANN201 - returns (GPT, TrainConfig); torch imported lazily
    """The model of a verified checkpoint (DCP reshards any world size into one process)."""
    import torch.distributed.checkpoint as dcp

    from trainer.config import from_dict
    from trainer.model import GPT

    v = mf.verify(ckpt_dir, allow_marked_bad=True)  # a bad mark judges training, not loadability
    if not v.ok:
        raise ValueError(f"checkpoint {ckpt_dir} cannot be used: {v.reason}")
    cfg = from_dict(v.manifest["config"])
    import warnings

    model = GPT(cfg.model)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that there is no process group: one process is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt_dir), no_dist=True)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg


def sample_lines(
    ckpt_dir: str | Path,
    n: int = 3,
    *,
    max_new_tokens: int = 48,
    seed: int = 0,
    temperature: float = 0.8,
    top_k: int = 40,
) -> list[str]:
    import torch

    from trainer.data import TokenData

    model, cfg = load_model(ckpt_dir)
    data = TokenData(cfg.data.path)
    tok = data.tokenizer()
    gen = torch.Generator().manual_seed(seed)
    start = torch.full((n, 1), data.eot_id, dtype=torch.long)
    out = model.generate(
        start, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, generator=gen
    )
    return [" ".join(tok.decode(row[1:]).split()) for row in out.tolist()]
