"""The numerics a checkpoint records, and what a resume under other settings reports."""

from __future__ import annotations

import json

import torch

from stanchion.sdk import numerics


def test_join_sets_the_reproducible_cublas_workspace_unless_one_is_named():
    env: dict[str, str] = {}
    numerics.prepare_environment(env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}  # the other documented reproducible setting
    numerics.prepare_environment(env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}


def test_the_settings_are_json_and_name_precision_and_parameter_dtypes():
    params = [torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)]
    s = numerics.settings(torch.device("cpu"), params, "bf16")
    assert json.loads(json.dumps(s)) == s
    assert s["precision"] == "bf16" and s["param_dtypes"] == ["bfloat16", "float32"]
    assert s["device"] == "cpu" and s["threads"] == torch.get_num_threads()
    assert numerics.settings(torch.device("cpu"), params, None)["precision"] == "as the parameters"


def test_differences_name_each_changed_setting_and_skip_unrecorded_ones():
    saved = {"threads": 1, "precision": "bf16", "tf32_matmul": False, "old_only": 1}
    now = {"threads": 2, "precision": "bf16", "tf32_matmul": True, "new_only": 1}
    assert numerics.differences(saved, now) == ["tf32_matmul: False -> True", "threads: 1 -> 2"]
    assert numerics.differences({}, now) == []  # a checkpoint from before numerics were recorded
    assert numerics.differences(now, dict(now)) == []
