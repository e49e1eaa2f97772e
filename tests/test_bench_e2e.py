"""`python -m pagedlab.bench.e2e`: pagedlab through its CLI and in-process beside HF generate, at a tiny size."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedlab.bench.e2e import default_kernels, main, report


def test_report_takes_medians_and_rates_every_row_against_vllm() -> None:
    requests = [SimpleNamespace(request_id=i) for i in range(2)]
    times = {"HF generate (padded)": [4.0, 2.0, 3.0], "pagedlab CLI (torch_gather)": [1.0, 5.0, 1.2],
             "vLLM CPU (compiled)": [0.9, 1.0, 1.1]}
    outputs = {"HF generate (padded)": {0: [1], 1: [2]}, "pagedlab CLI (torch_gather)": {0: [1], 1: [3]},
               "vLLM CPU (compiled)": {0: [1], 1: [2]}}
    rows = {line.split("  ")[0]: line.split() for line in report(times, outputs, requests, 100, 3).splitlines()[2:]}
    cli = rows["pagedlab CLI (torch_gather)"]
    assert cli[-5:] == ["1.200", "1.000-5.000", "83.3", "0.83", "1/2"]  # median, min-max, tok/s, x vLLM, matches
    assert rows["vLLM CPU (compiled)"][-2:] == ["1.00", "2/2"]


@pytest.mark.slow
def test_e2e_runs_the_cli_and_matches_hf_generate(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--num-requests", "3", "--prompt-len", "4,12", "--output-len", "2,6", "--repeats", "1", "--device", "cpu",
          "--no-hf-modules", "--no-hf-continuous"])
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines() if line.startswith(("HF", "pagedlab"))}
    kernels = default_kernels(torch.device("cpu")).split(",")  # cpu first where it can be built here
    assert set(rows) == {"HF generate (padded)", f"pagedlab CLI ({kernels[0]})",
                         *(f"pagedlab {k} (in-process)" for k in kernels)}
    assert all(r[-1] == "3/3" for r in rows.values())  # greedy outputs equal HF generate's
