"""scripts/chat_rl.py with a reward a tiny model earns from its first step, the fraction of '7's in the completion
(the cpu task's answers are never right this early: every advantage, gradient and update would be zero), so
that tests/test_interrupt.py's RL runs change their parameters at every step.

    python tests/rl_dense_reward.py [chat_rl.py's arguments]
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanochat_jax.common import run_script  # noqa: E402
from nanochat_jax.tasks.corpuschat import WordProblems  # noqa: E402

WordProblems.reward = lambda self, conversation, completion: completion.count("7") / max(1, len(completion))

if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("chat_rl", ROOT / "scripts" / "chat_rl.py")
    chat_rl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat_rl)
    run_script(chat_rl.main)
