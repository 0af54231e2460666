"""What a policy observes, built only from the read-only view (`envs.sim.view`) and without
Gymnasium: the Dispatch-v0 vector (`dispatch`) and the Knobs-v0 vector and knob actions (`knobs`).
The envs (`envs.gym`) and trained policies (`policies.trained`) build them with the same code, in
the simulator and in the deploy gateway alike.
"""


class InvalidActionError(ValueError):
    """An action that is not an engine index, is out of range, or is masked (padding, engine down)."""
