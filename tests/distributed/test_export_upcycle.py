"""`turnout export` and `train.init_from` on a real checkpoint (2 gloo ranks, ep 2, ZeRO-1).

The checkpoint's experts are split over the two ranks' slices; export consolidates them,
``TransformerLM.from_pretrained`` reproduces ``load_for_inference``'s logits, and a new
run whose ``setup`` upcycles 4 -> 8 experts (top_k 2 -> 4, the same capacity factor,
expert-parallel again) starts with the source model's logits and tags its MLflow run
with its parent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.decisions import recorded
from tests.distributed.test_export import _train
from tests.spawn import run_ranks
from turnout.config.load import load_config
from turnout.files import TOKENIZER_FILE
from turnout.launch.cli import main
from turnout.models.lm import TransformerLM
from turnout.trainer.weights.from_checkpoint import load_for_inference

pytestmark = pytest.mark.distributed

TOKENS_BS = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("export_upcycle")
    out = _train(tmp, 2, (1,))
    out["tmp"] = tmp
    return out


def test_export_then_from_pretrained(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = Path(trained["stages"][1]["folder"])
    (folder / TOKENIZER_FILE).write_text('{"model": {"type": "BPE"}}')  # as hE's save writes
    out = tmp_path / "exported"
    assert main(["export", str(folder.parent), str(out)]) == 0
    assert "exported step 2 (turnout" in capsys.readouterr().out
    assert (out / TOKENIZER_FILE).read_text() == (folder / TOKENIZER_FILE).read_text()
    source, _, _ = load_for_inference(folder)
    loaded = TransformerLM.from_pretrained(out)
    assert loaded.layers[1].block.ffn.experts.w_gate_EDF.shape[0] == 4
    with torch.no_grad():
        for routing in ("topk", "causal"):
            got = loaded(TOKENS_BS, routing=routing).logits
            # Bitwise: the same weights through the same modules and kernels, one process.
            torch.testing.assert_close(
                got, source(TOKENS_BS, routing=routing).logits, atol=0, rtol=0
            )

    assert main(["export", str(folder), str(out)]) == 2  # not an empty folder
    assert "OUT" in capsys.readouterr().err
    assert main(["export", str(folder), str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.layer_pattern" in err


def _upcycled_forward(rank: int, world: int, items: list[str], data: str) -> dict:
    from turnout.parallel.groups import build_groups
    from turnout.trainer.run_setup import setup

    cfg = load_config("tiny", items)
    run = setup(cfg, Path(data), build_groups(cfg.parallel.ep_size))
    run.engine.eval()
    with torch.no_grad():
        logits = run.engine(TOKENS_BS).logits
    run.tracker.finish("FINISHED")
    return dict(logits=logits, run_id=run.tracker.run_id)


def test_setup_upcycles_4_to_8_experts(trained: dict) -> None:
    from tests.distributed.test_train_loop import _overrides
    from turnout.trainer.data.batches import prepare_corpus

    tmp: Path = trained["tmp"]
    folder = trained["stages"][1]["folder"]
    items = [
        *_overrides(tmp, steps=2),
        "parallel.ep_size=2",
        "model.moe.num_experts=8",
        "model.moe.top_k=4",
        f"train.init_from={folder}",
        "train.seed=99",
    ]
    data = prepare_corpus(load_config("tiny", items).data)
    res = run_ranks(_upcycled_forward, 2, items, str(data))
    source, _, _ = load_for_inference(folder)
    with torch.no_grad(), recorded(source) as decisions:
        expected = source(TOKENS_BS).logits
    # The upcycled top-4 cut (between the copies of the source's 2nd and 3rd expert) reads
    # logits of a [D, 8] router GEMM, the source's top-2 those of a [D, 4] one. (The MoD
    # top-k reads block 0's output, bitwise the same in both models: copied dense weights.)
    decisions.only("moe").assert_clear("the source's expert top-2")
    for r in res:
        # fp32 rounding of the expert copies' gate-weighted sums (and of EP's buckets).
        torch.testing.assert_close(r["logits"], expected, atol=1e-5, rtol=1e-5)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    tags = mlflow.MlflowClient().get_run(res[0]["run_id"]).data.tags
    assert tags["turnout.parent"] == folder
