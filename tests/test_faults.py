"""Faults during training that must cost one sample, not the run."""

import pytest

from gspo.data import load_humaneval
from gspo.scoring import score as _score


@pytest.mark.slow  # each hostile program runs to its time limit
def test_hanging_and_flooding_programs_score_zero_and_training_goes_on():
    problem = next(e for e in load_humaneval() if e.reference["task_id"] == "HumanEval/0")
    good = problem.reference["canonical_solution"]
    hostile = [
        "    import signal\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    while True:\n        pass\n",
        "    while True:\n        print('x' * 100000)\n",
        "    import os\n    while True:\n        os.fork()\n",
        "    return [[] for _ in range(1_500_000)]\n",  # a reply that would cost the trainer 250 MB to decode
        good,
        f"Sure:\n```python\n{problem.reference['prompt']}{good}```\n",  # a chat answer: judged as in evaluation
    ]
    scores, per_task = _score(hostile, [problem] * len(hostile))
    assert scores.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert per_task == {"humaneval": [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]}
    # The evaluator is still usable afterwards.
    assert _score([good], [problem])[0].tolist() == [1.0]
