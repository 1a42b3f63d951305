"""A defense that does not apply (ANP on a model without batch norm) is recorded as n/a, not crashed."""

from backdoor.harness.cache import ArtifactCache
from backdoor.harness.case import Case
from backdoor.harness.case_record import StageLog, case_record
from backdoor.harness.runner import Runner
from backdoor.harness.report.leaderboard import leaderboard_frame
from backdoor.training import TrainConfig


def test_anp_on_vgg19_is_recorded_not_applicable(tmp_path):
    runner = Runner(ArtifactCache(tmp_path), "cpu")
    case = Case(matrix="t", dataset="synthetic", model="vgg19", attack="badnets", defense="anp", ratio=0.1, seed=0,
                dataset_params={"train_size": 40, "test_size": 20}, training=TrainConfig(epochs=1))
    log = StageLog()
    data = runner.dataset(case, log)
    model = runner.new_model(case, data)
    defended, result = runner.defend(case, model, data, None, {"untrained": True}, log)
    assert defended is None and "batch" in result["not_applicable"].lower()
    record = case_record(case, None, None, result, log, runner.provenance(case))
    assert record["status"] == "not_applicable" and record["c_acc"] is None
    board = leaderboard_frame([dict(record, poison_ratio=0.1, attack="badnets")])
    assert board[("ANP", "ASR")].tolist() == ["n/a"]
