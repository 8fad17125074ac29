"""The registry of stages (stage.name): what each trains, reads and needs, in pure Python, so that
validation knows every stage without importing Megatron.

A stage is a `TaskSpec`: its data kinds, the roles beside the trained model it uses under a
config, its own config checks, and the class (in llmtrain.megatron, imported only by the
training processes) that builds its model, batches and step. A new stage is one `register`
call, its task class and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from llmtrain.config.schema import Config

# Problems of a config for its stage: (config, data-parallel size, whether the processes
# generate rollouts) -> plain-words problems.
Checks = Callable[[Config, int, bool], list[str]]


def _no_checks(cfg: Config, data_parallel_size: int, generates: bool) -> list[str]:
    return []


def _no_roles(cfg: Config) -> set[str]:
    return set()


@dataclass(frozen=True)
class TaskSpec:
    name: str
    # "module:Class" of the task the training loop runs (an llmtrain.megatron.tasks.Task).
    implementation: str
    # The data kinds it reads (data.kind); the first is the one to suggest.
    data_kinds: tuple[str, ...]
    # Whether it generates rollouts with the trained model (grpo, ppo).
    generates: bool = False
    # Roles beside the trained model that a config uses: reference, reward (a reward model),
    # critic.
    roles: Callable[[Config], set[str]] = _no_roles
    # Every role it may use under some config (for the messages that name where a setting
    # applies).
    possible_roles: frozenset[str] = field(default_factory=frozenset)
    checks: Checks = _no_checks
    # Whether it trains low-rank adapters on a frozen base (peft=lora).
    adapters: bool = False
    # Whether its model ends in a scalar head (a reward model) instead of the output layer.
    scalar_head: bool = False


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"stage {spec.name} is registered twice")
    TASKS[spec.name] = spec
    return spec


def task_spec(name: str) -> Optional[TaskSpec]:
    """The registered stage of that name (None: no such stage; validation reports it)."""
    _load_builtin()
    return TASKS.get(name)


def stage_names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(TASKS)


def stages_where(wanted: Callable[[TaskSpec], bool]) -> list[str]:
    _load_builtin()
    return [name for name, spec in TASKS.items() if wanted(spec)]


def either(names: list[str]) -> str:
    """"a", "a or b", "a, b or c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _load_builtin() -> None:
    """The built-in stages register themselves when their modules are imported."""
    import llmtrain.rlhf.stages  # noqa: F401  (alignment stages)


LM_DATA = ("corpus", "indexed", "mock", "sft")
LANGUAGE_MODEL = "llmtrain.megatron.tasks.language_model:LanguageModelTask"
register(TaskSpec("pretrain", LANGUAGE_MODEL, LM_DATA))
register(TaskSpec("sft", LANGUAGE_MODEL, LM_DATA, adapters=True))
