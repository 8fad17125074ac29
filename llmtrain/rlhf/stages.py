"""The alignment stages in the stage registry (llmtrain.tasks): rm, dpo, kto, grpo, ppo."""

from __future__ import annotations

from llmtrain.config.schema import Config
from llmtrain.rlhf.checks import kto_problems, preference_problems, rollout_problems
from llmtrain.rlhf.losses import PREFERENCE_LOSSES
from llmtrain.rlhf.rewards import weights
from llmtrain.tasks import TaskSpec, register

ALIGN = "llmtrain.megatron.align"


def _dpo_roles(cfg: Config) -> set[str]:
    loss = PREFERENCE_LOSSES.get(cfg.stage.alignment.loss_type)
    return {"reference"} if loss is None or loss.uses_reference else set()


def _rollout_roles(critic: bool):
    def roles(cfg: Config) -> set[str]:
        a = cfg.stage.alignment
        return ({"reference"} | ({"reward"} if "model" in weights(a) else set())
                | ({"critic"} if critic else set()))
    return roles


register(TaskSpec("rm", f"{ALIGN}.preference:RewardModelTask", ("preference",), adapters=True,
                  scalar_head=True))
register(TaskSpec("dpo", f"{ALIGN}.preference:PolicyPreferenceTask", ("preference",),
                  roles=_dpo_roles, possible_roles=frozenset({"reference"}),
                  checks=preference_problems, adapters=True))
register(TaskSpec("kto", f"{ALIGN}.kto:KTOTask", ("unpaired",),
                  roles=lambda cfg: {"reference"}, possible_roles=frozenset({"reference"}),
                  checks=kto_problems, adapters=True))
register(TaskSpec("grpo", f"{ALIGN}.rollout:RolloutTask", ("prompts",), generates=True,
                  roles=_rollout_roles(critic=False),
                  possible_roles=frozenset({"reference", "reward"}), checks=rollout_problems,
                  adapters=True))
register(TaskSpec("ppo", f"{ALIGN}.rollout:RolloutTask", ("prompts",), generates=True,
                  roles=_rollout_roles(critic=True),
                  possible_roles=frozenset({"reference", "reward", "critic"}),
                  checks=rollout_problems, adapters=True))
