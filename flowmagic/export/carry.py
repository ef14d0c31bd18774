"""What each Metaflow join must carry forward (pure).

Metaflow passes artifacts along linear transitions but not through a join.
In the notebook, a step reads the value of its nearest preceding writer. Along
any Metaflow path the steps are in notebook order, so the value a step sees in
Metaflow is the one of the *latest writer, in notebook order, among its
ancestors*; this module tracks that writer for every artifact and tells each
join how to keep it so:

- foreach join: the names the foreach's tasks wrote are gathered into lists,
  in item order (``self.x = [inp.x for inp in inputs]``);
- static join: a name that the branches hold with different writers gets the
  latest writer's value explicitly (``self.x = inputs.b.x``);
- everything else is identical in every input (or present in only one) and
  ``self.merge_artifacts(inputs)`` carries it exactly.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from flowmagic.errors import FlowDefinitionError
from flowmagic.export.structure import MfStep

Writer = tuple[int, str]   # (notebook position of the writing step, tag)


@dataclass
class JoinPlan:
    gathered: list[str] = field(default_factory=list)               # foreach join
    explicit: list[tuple[str, str]] = field(default_factory=list)   # (name, input step): static join
    merged: list[str] = field(default_factory=list)                  # carried by merge_artifacts

    @property
    def merge(self) -> bool:
        return bool(self.merged)


def plan_joins(steps: Mapping[str, MfStep], writes: Mapping[str, frozenset[str]],
               position: Mapping[str, int]) -> dict[str, JoinPlan]:
    """Join plans by step name. ``writes``: the self.<name> artifacts each real
    step writes; ``position``: notebook position of each real step."""
    states: dict[str, dict[str, Writer]] = {}
    plans: dict[str, JoinPlan] = {}
    for name in topological(steps):
        node = steps[name]
        if node.join == "foreach":
            state, plans[name] = _foreach_join(node, steps, states, position)
        elif node.join == "static":
            state, plans[name] = _static_join(node, states)
        else:
            state = dict(states[node.inputs_from[0]]) if node.inputs_from else {}
        if node.real:
            for var in writes.get(name, ()):
                state[var] = (position[name], name)
        states[name] = state
    _check_step_name_clashes(steps, plans)
    return plans


def _foreach_join(node: MfStep, steps: Mapping[str, MfStep], states: Mapping[str, dict[str, Writer]],
                  position: Mapping[str, int]) -> tuple[dict[str, Writer], JoinPlan]:
    body = states[node.inputs_from[0]]
    split = steps[node.closes].inputs_from[0]
    before = states[split]
    plan = JoinPlan()
    state = dict(body)
    tag = (position[node.closes], f"gathered in {node.name}")
    for var in sorted(body):
        if body[var] != before.get(var):
            plan.gathered.append(var)
            state[var] = tag
        else:
            plan.merged.append(var)
    return state, plan


def _static_join(node: MfStep, states: Mapping[str, dict[str, Writer]]) -> tuple[dict[str, Writer], JoinPlan]:
    plan = JoinPlan()
    state: dict[str, Writer] = {}
    incoming = [(source, states[source]) for source in node.inputs_from]
    for var in sorted(set().union(*(s for _, s in incoming))):
        holders = [(s[var], source) for source, s in incoming if var in s]
        if len({writer for writer, _ in holders}) == 1:
            plan.merged.append(var)
            state[var] = holders[0][0]
            continue
        writer, source = max(holders, key=lambda h: h[0][0])
        plan.explicit.append((var, source))
        state[var] = writer
    return state, plan


def _check_step_name_clashes(steps: Mapping[str, MfStep], plans: Mapping[str, JoinPlan]) -> None:
    """On a Metaflow flow object, `self.<step>` is the step: an artifact of that
    name can be written, but not read back or carried through a join."""
    for join, plan in plans.items():
        for var in plan.gathered + [v for v, _ in plan.explicit] + plan.merged:
            if var in steps:
                raise FlowDefinitionError(
                    f"the variable {var!r} reaches the join {join!r}, but a step has the same name and "
                    f"Metaflow would read self.{var} as that step: rename the variable or the step",
                    variable=var)


def topological(steps: Mapping[str, MfStep], rank=None) -> list[str]:
    """Kahn's order of the Metaflow steps; ``rank`` breaks ties among ready steps."""
    pending = {name: len(node.inputs_from) for name, node in steps.items()}
    ready = [name for name, count in pending.items() if count == 0]
    order: list[str] = []
    while ready:
        if rank is not None:
            ready.sort(key=rank)
        name = ready.pop(0)
        order.append(name)
        for child in steps[name].next:
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)
    return order
