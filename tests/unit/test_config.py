"""The trainer's job spec: presets, a TOML file naming its own preset, and every validation check
naming its key."""

from __future__ import annotations

import pytest

from stanchion.settings import ConfigError
from trainer import config
from trainer.config import PRESETS, DataConfig, TrainConfig, resolve


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def get(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_resolves_to_its_fields_over_the_defaults(name):
    cfg = resolve(name)
    assert cfg.preset == name
    preset = flatten(PRESETS[name])
    for key, value in preset.items():
        assert get(cfg, key) == value, key
    # Everything the preset does not name keeps the dataclass default.
    defaults = flatten(config.to_dict(TrainConfig()))
    for key, value in defaults.items():
        if key not in preset and key != "preset":
            assert flatten(config.to_dict(cfg))[key] == value, key


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_from_dict_round_trip(name):
    cfg = resolve(name)
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_a_toml_file_may_name_its_own_preset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "gpt2-124m"\nsteps = 50\n[optim]\nwarmup_steps = 5\n')
    cfg = resolve("tiny", toml_path=path)
    assert cfg.preset == "gpt2-124m"
    assert cfg.model.d_model == 768 and cfg.model.norm == "layernorm"
    assert cfg.steps == 50 and cfg.optim.warmup_steps == 5 and cfg.optim.lr == 6e-4

    # An explicit override of the preset beats the file's.
    cfg = resolve("llama-1b", toml_path=path, overrides={"preset": "tiny"})
    assert cfg.preset == "tiny" and cfg.model.d_model == 128 and cfg.steps == 50


def test_overrides_beat_the_file_and_the_file_beats_the_preset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("steps = 60\n[model]\nn_layer = 2\nd_model = 64\n")
    cfg = resolve("tiny", toml_path=path, overrides={"model": {"n_layer": 3}})
    assert (cfg.steps, cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (60, 3, 64, 4)


def test_unknown_preset_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve("huge")
    assert str(e.value) == "preset: unknown preset 'huge'; expected one of: tiny, gpt2-124m, llama-1b"
    path = tmp_path / "run.toml"
    path.write_text('preset = "nano"\n')
    with pytest.raises(ConfigError, match=r"^preset: unknown preset 'nano'"):
        resolve("tiny", toml_path=path)


def test_unknown_key_in_a_section_is_named():
    with pytest.raises(ConfigError, match=r"^unknown key 'model\.n_layers' in \[model\]"):
        resolve("tiny", overrides={"model": {"n_layers": 2}})


def case(overrides: dict, key: str, fragment: str, marks: object = ()) -> object:
    """(overrides on the tiny preset, the key the error must name, a fragment of the message)"""
    ((section, inner),) = overrides.items()
    value = flatten(inner, f"{section}.") if isinstance(inner, dict) else {section: inner}
    return pytest.param(
        overrides, key, fragment, marks=marks, id=",".join(f"{k}={v}" for k, v in value.items())
    )


REQUIRE_CASES = [
    case({"model": {"vocab_size": -1}}, "model.vocab_size", "must be >= 0"),
    case({"model": {"n_layer": 0}}, "model.n_layer", "must be > 0"),
    case({"model": {"n_head": 0}}, "model.n_head", "must be > 0"),
    case({"model": {"n_kv_head": 0}}, "model.n_kv_head", "must be > 0"),
    case({"model": {"d_model": 0}}, "model.d_model", "must be > 0"),
    case({"model": {"max_seq_len": 0}}, "model.max_seq_len", "must be > 0"),
    case({"model": {"d_model": 130}}, "model.d_model", "130 is not divisible by model.n_head=4"),
    case({"model": {"d_model": 12}}, "model.n_head", "head size must be even"),
    case({"model": {"n_kv_head": 3}}, "model.n_kv_head", "must divide model.n_head=4"),
    case({"model": {"d_ff": -1}}, "model.d_ff", "must be >= 0"),
    case({"model": {"z_loss": -1e-4}}, "model.z_loss", "must be >= 0"),
    case({"model": {"init_std": 0.0}}, "model.init_std", "must be > 0"),
    case({"data": {"seq_len": 0}}, "data.seq_len", "must be > 0"),
    case({"data": {"micro_batch_size": 0}}, "data.micro_batch_size", "must be > 0"),
    case({"data": {"global_batch_size": 0}}, "data.global_batch_size", "must be > 0"),
    case(
        {"data": {"global_batch_size": 20}},
        "data.global_batch_size",
        "20 is not a multiple of data.micro_batch_size=8",
    ),
    case({"optim": {"lr": 0.0}}, "optim.lr", "must be > 0"),
    case({"optim": {"min_lr": 1.0}}, "optim.min_lr", "must be between 0 and optim.lr"),
    case({"optim": {"min_lr": -1e-5}}, "optim.min_lr", "must be between 0 and optim.lr"),
    case({"optim": {"weight_decay": -0.1}}, "optim.weight_decay", "must be >= 0"),
    case({"optim": {"beta1": 1.0}}, "optim.beta1", "must be in [0, 1)"),
    case({"optim": {"beta2": 1.0}}, "optim.beta2", "must be in [0, 1)"),
    case({"optim": {"eps": 0.0}}, "optim.eps", "must be > 0"),
    case({"optim": {"grad_clip": -1.0}}, "optim.grad_clip", "must be >= 0"),
    case({"optim": {"warmup_steps": -1}}, "optim.warmup_steps", "must be >= 0"),
    case({"optim": {"decay_start_fraction": 1.5}}, "optim.decay_start_fraction", "must be in [0, 1]"),
    case({"integrity": {"fingerprint_every": -1}}, "integrity.fingerprint_every", "must be >= 0"),
    case({"integrity": {"audit_every": -1}}, "integrity.audit_every", "must be >= 0"),
    case({"integrity": {"snapshot_every": -1}}, "integrity.snapshot_every", "must be >= 0"),
    case({"integrity": {"snapshots_kept": 0}}, "integrity.snapshots_kept", "must be >= 1"),
    case({"integrity": {"spike_window": 2}}, "integrity.spike_window", "must be >= 3"),
    case({"integrity": {"spike_min_history": 2}}, "integrity.spike_min_history", "between 3 and"),
    case({"integrity": {"spike_min_history": 51}}, "integrity.spike_min_history", "between 3 and"),
    case({"integrity": {"spike_loss_z": 0.0}}, "integrity.spike_loss_z", "must be > 0"),
    case({"integrity": {"spike_grad_z": 0.0}}, "integrity.spike_grad_z", "> 0"),
    case({"integrity": {"flight_records": 0}}, "integrity.flight_records", "must be >= 1"),
    case({"steps": 0}, "steps", "must be > 0"),
    case({"checkpoint_every": -1}, "checkpoint_every", "must be >= 0"),
    case({"keep_checkpoints": 0}, "keep_checkpoints", "must be >= 1"),
    case({"eval_every": -1}, "eval_every", "must be >= 0"),
    case({"eval_batches": 0}, "eval_batches", "must be > 0"),
    case({"hsdp_replicate": 0}, "hsdp_replicate", "must be >= 1"),
    case({"threads": 0}, "threads", "must be >= 1"),
    case({"data": {"seq_len": 256}}, "data.seq_len", "256 exceeds model.max_seq_len=128"),
    case({"optim": {"warmup_steps": 300}}, "optim.warmup_steps", "exceeds steps=200"),
]


@pytest.mark.parametrize(("overrides", "key", "fragment"), REQUIRE_CASES)
def test_every_check_names_its_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as e:
        resolve("tiny", overrides=overrides)
    message = str(e.value)
    assert message.startswith(f"{key}: "), message
    assert fragment in message


def test_the_tiny_preset_itself_is_valid():
    """The table above is meaningful only if the preset passes without its override."""
    cfg = resolve("tiny")
    assert (cfg.model.n_head, cfg.data.micro_batch_size, cfg.model.max_seq_len, cfg.steps) == (4, 8, 128, 200)
    assert cfg.integrity.spike_window == 50


@pytest.mark.parametrize(("world", "accum"), [(1, 6), (2, 3), (3, 2), (6, 1)])
def test_grad_accum_keeps_the_global_batch(world, accum):
    assert DataConfig(micro_batch_size=2, global_batch_size=12).grad_accum(world) == accum


@pytest.mark.parametrize(("world", "multiple"), [(4, 8), (5, 10), (12, 24)])
def test_grad_accum_that_does_not_divide_says_what_would(world, multiple):
    with pytest.raises(ConfigError) as e:
        DataConfig(micro_batch_size=2, global_batch_size=12).grad_accum(world)
    assert str(e.value) == (
        f"data.global_batch_size: 12 sequences do not divide over {world} data-parallel ranks x "
        f"data.micro_batch_size=2; choose a global batch that is a multiple of {multiple}"
    )


def test_check_world_validates_hsdp_replicas_and_batch_layout():
    data = {"micro_batch_size": 2, "global_batch_size": 24}
    fsdp = resolve("tiny", overrides={"parallel": "fsdp", "hsdp_replicate": 2, "data": data})
    assert fsdp.check_world(4) == 3
    with pytest.raises(ConfigError) as e:
        fsdp.check_world(3)
    assert str(e.value) == "hsdp_replicate: 2 replica groups do not divide 3 ranks"
    # Under DDP the replica count plays no part; only the batch layout is checked.
    ddp = resolve("tiny", overrides={"hsdp_replicate": 2, "data": data})
    assert ddp.check_world(3) == 4
    with pytest.raises(ConfigError, match=r"^data\.global_batch_size: 24 sequences do not divide over 5"):
        ddp.check_world(5)


def test_with_overrides_returns_a_validated_copy():
    cfg = resolve("tiny")
    changed = cfg.with_overrides({"model": {"n_layer": 2}, "steps": 50})
    assert changed.model.n_layer == 2 and changed.steps == 50
    assert changed.model.d_model == cfg.model.d_model and changed.optim == cfg.optim
    assert cfg.model.n_layer == 4 and cfg.steps == 200  # frozen original untouched
    assert changed == resolve("tiny", overrides={"model": {"n_layer": 2}, "steps": 50})
    assert cfg.with_overrides({}) == cfg
    with pytest.raises(
        ConfigError, match=r"^optim\.warmup_steps: 20 exceeds steps=10: .* optim\.warmup_steps=2$"
    ):
        cfg.with_overrides({"steps": 10})
    with pytest.raises(ConfigError, match=r"^unknown key 'data\.bogus'"):
        cfg.with_overrides({"data": {"bogus": 1}})
