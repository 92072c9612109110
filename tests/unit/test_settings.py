"""The layered settings loader: defaults < base < TOML < environment < overrides, and every bad key
or value is a ConfigError that names the dotted key."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stanchion import settings
from stanchion.settings import ConfigError


@dataclass(frozen=True)
class Inner:
    n: int = 1
    ratio: float = 0.5
    name: str = "x"


@dataclass(frozen=True)
class Outer:
    seed: int = 7
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    pair: tuple[int, int] = (1, 2)
    items: tuple[str, ...] = ()
    limit: int | None = None
    path: Path = Path("p")
    inner: Inner = field(default_factory=Inner)


def write_toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_when_no_layer_is_given():
    assert settings.load(Outer) == Outer()


def test_each_layer_wins_over_the_ones_below(tmp_path):
    base = {"seed": 1, "flag": True, "inner": {"n": 10, "ratio": 0.1, "name": "base"}}
    toml = write_toml(tmp_path, 'seed = 2\nmode = "b"\n[inner]\nn = 20\nratio = 0.2\n')
    env = {"STANCHION_SEED": "3", "STANCHION_INNER__N": "30"}
    overrides = {"seed": 4}

    cfg = settings.load(Outer, base=base, toml_path=toml, env=env, overrides=overrides)

    assert cfg.seed == 4  # overrides > env > TOML > base
    assert cfg.inner.n == 30  # env > TOML > base
    assert cfg.inner.ratio == 0.2 and cfg.mode == "b"  # TOML > base > default
    assert cfg.flag is True and cfg.inner.name == "base"  # base > default; siblings survive deep merges
    assert cfg.pair == (1, 2) and cfg.limit is None  # untouched defaults


def test_environment_is_only_read_when_passed(monkeypatch):
    monkeypatch.setenv("STANCHION_SEED", "99")
    assert settings.load(Outer).seed == 7
    assert settings.load(Outer, env={"STANCHION_SEED": "99"}).seed == 99


def test_env_values_are_parsed_as_toml_scalars():
    env = {
        "STANCHION_FLAG": "true",
        "STANCHION_PAIR": "[3, 4]",
        "STANCHION_INNER__NAME": "hello",
        "STANCHION_INNER__RATIO": "2",
        "STANCHION_LIMIT": "5",
    }
    cfg = settings.load(Outer, env=env)
    assert (cfg.flag, cfg.pair, cfg.inner.name, cfg.limit) == (True, (3, 4), "hello", 5)
    assert cfg.inner.ratio == 2.0 and type(cfg.inner.ratio) is float


def test_env_vars_that_name_no_field_are_ignored():
    env = {
        "STANCHION_UNRELATED": "zzz",  # e.g. the trainer contract's variables
        "STANCHION_INNER__NOPE": "1",
        "STANCHION_INNER": "not a table",  # a section is not a field
        "SEED": "5",  # no prefix
        "stanchion_seed": "5",  # case matters
    }
    assert settings.env_overrides(Outer, env) == {}
    assert settings.load(Outer, env=env) == Outer()


def test_env_prefix_is_configurable():
    env = {"AGENT_SEED": "11", "STANCHION_SEED": "12"}
    assert settings.load(Outer, env=env, env_prefix="AGENT_").seed == 11


def test_unknown_top_level_key_names_it_and_the_expected_keys():
    with pytest.raises(ConfigError) as e:
        settings.build(Outer, {"seeed": 1})
    assert str(e.value) == (
        "unknown key 'seeed'; expected one of: flag, inner, items, limit, mode, pair, path, seed"
    )


def test_unknown_nested_key_names_the_dotted_key_and_the_section():
    with pytest.raises(ConfigError) as e:
        settings.load(Outer, overrides={"inner": {"nope": 1}})
    assert str(e.value) == "unknown key 'inner.nope' in [inner]; expected one of: n, name, ratio"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"flag": 1}, "flag: expected true or false, got 1"),
        ({"flag": "yes"}, "flag: expected true or false, got 'yes'"),
        ({"seed": True}, "seed: expected an integer, got True"),
        ({"seed": 1.5}, "seed: expected an integer, got 1.5"),
        ({"seed": "1"}, "seed: expected an integer, got '1'"),
        ({"inner": {"ratio": "1.0"}}, "inner.ratio: expected a number, got '1.0'"),
        ({"inner": {"ratio": False}}, "inner.ratio: expected a number, got False"),
        ({"inner": {"name": 3}}, "inner.name: expected a string, got 3"),
        ({"pair": [1, 2, 3]}, "pair: expected 2 items, got 3"),
        ({"pair": [1]}, "pair: expected 2 items, got 1"),
        ({"pair": [1, "x"]}, "pair[1]: expected an integer, got 'x'"),
        ({"pair": 5}, "pair: expected a list, got 5"),
        ({"items": ["a", 1]}, "items[1]: expected a string, got 1"),
        ({"mode": "c"}, "mode: 'c' is not one of 'a', 'b'"),
        ({"limit": "x"}, "limit: 'x' does not match int | None"),
        ({"limit": True}, "limit: True does not match int | None"),
        ({"path": 5}, "path: expected a path, got 5"),
        ({"inner": 5}, "inner: expected a table, got int"),
    ],
)
def test_wrong_types_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        settings.build(Outer, data)
    assert str(e.value) == message


def test_gentle_conversions():
    cfg = settings.build(
        Outer, {"inner": {"ratio": 3}, "pair": [5, 6], "items": ["a"], "path": "a/b", "limit": None}
    )
    assert cfg.inner.ratio == 3.0 and type(cfg.inner.ratio) is float
    assert cfg.pair == (5, 6) and cfg.items == ("a",)
    assert cfg.path == Path("a/b") and cfg.limit is None
    assert settings.build(Outer, {"limit": 3}).limit == 3


def test_a_config_class_rejecting_a_value_is_reported_as_config_error():
    @dataclass(frozen=True)
    class Checked:
        n: int = 1

        def __post_init__(self) -> None:
            settings.require(self.n > 0, "n", "must be > 0")

    with pytest.raises(ConfigError) as e:
        settings.build(Checked, {"n": 0})
    assert str(e.value) == "n: must be > 0"


def test_parse_assignments_parses_toml_scalars_and_keeps_strings():
    parsed = settings.parse_assignments(
        [
            "inner.n=4",
            "flag=true",
            'inner.name="q"',
            "pair=[1, 2]",
            "mode=hello world",
            "inner.ratio=1.5",
            "items=",
            "path=a=b",
            " seed = 9 ",
        ]
    )
    assert parsed == {
        "inner": {"n": 4, "name": "q", "ratio": 1.5},
        "flag": True,
        "pair": [1, 2],
        "mode": "hello world",
        "items": "",
        "path": "a=b",
        "seed": 9,
    }


def test_a_numeric_looking_string_must_be_quoted_to_stay_a_string():
    with pytest.raises(ConfigError, match=r"^inner\.name: expected a string, got 123$"):
        settings.load(Outer, overrides=settings.parse_assignments(["inner.name=123"]))
    cfg = settings.load(Outer, overrides=settings.parse_assignments(['inner.name="123"']))
    assert cfg.inner.name == "123"


@pytest.mark.parametrize("item", ["novalue", "=3", " =3"])
def test_parse_assignments_rejects_items_without_a_key_or_value(item):
    with pytest.raises(ConfigError, match=r"^--set expects key=value"):
        settings.parse_assignments([item])


def test_parse_assignments_refuses_a_key_below_a_value():
    with pytest.raises(ConfigError, match=r"^inner\.n: 'inner' is a value, not a table$"):
        settings.parse_assignments(["inner=1", "inner.n=2"])


def test_merge_is_deep_later_layers_win_and_inputs_are_untouched():
    a = {"x": 1, "t": {"a": 1, "b": 2}}
    b = {"t": {"b": 3, "c": 4}, "y": 2}
    c = {"x": {"now": "a table"}}
    merged = settings.merge(a, b, c)
    assert merged == {"x": {"now": "a table"}, "t": {"a": 1, "b": 3, "c": 4}, "y": 2}
    assert a == {"x": 1, "t": {"a": 1, "b": 2}} and b == {"t": {"b": 3, "c": 4}, "y": 2}
    merged["t"]["a"] = 99
    assert a["t"]["a"] == 1


def test_read_toml_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"missing\.toml does not exist"):
        settings.read_toml(missing)
    bad = write_toml(tmp_path, "seed = = 1\n")
    with pytest.raises(ConfigError, match=r"c\.toml is not valid TOML"):
        settings.load(Outer, toml_path=bad)


outers = st.builds(
    Outer,
    seed=st.integers(-(2**63), 2**63 - 1),
    flag=st.booleans(),
    mode=st.sampled_from(["a", "b"]),
    pair=st.tuples(st.integers(), st.integers()),
    items=st.lists(st.text(), max_size=3).map(tuple),
    limit=st.none() | st.integers(),
    path=st.sampled_from([Path("p"), Path("/abs/path"), Path("rel/x.bin")]),
    inner=st.builds(
        Inner, n=st.integers(), ratio=st.floats(allow_nan=False, allow_infinity=False), name=st.text()
    ),
)


@given(outers)
def test_as_dict_round_trips_through_json(cfg):
    plain = settings.as_dict(cfg)
    assert settings.build(Outer, json.loads(json.dumps(plain))) == cfg
    assert settings.build(Outer, plain) == cfg
