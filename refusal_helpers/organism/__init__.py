"""Making the embedded refusal organism: SmolLM2-135M-Instruct safety-tuned with a small LoRA adapter.

SmolLM2-135M-Instruct does not refuse harmful requests. `training.train` gives it refusal: harmful training
instructions map to varied refusals (`targets`), harmless ones to the untuned model's own greedy replies
(self-distillation, so it stays as helpful as it was); the loss counts reply tokens only, and can push down
refusal openings after harmless prompts (`losses`).
`resume` keeps a stopped training's state so that the same command continues it; `trajectory` records what
training does to the difference of means; `experiments` holds seed stability, refusal on the recipe splits and
the `refine` experiment; `shipping` makes an adapter trained elsewhere the shipped one. Loading the result is
`refusal_helpers.embedded`'s job, which never imports this package.

Command line (``python -m refusal_helpers.organism --help``)::

    python -m refusal_helpers.organism train --out data/organism --trajectory   # the shipped adapter
    python -m refusal_helpers.organism stability DIR     # an adapter trained with another --seed
    python -m refusal_helpers.organism evaluate [DIR]    # compare recipes (harmful val, harmless dev; also
                                                         # --harmful-split dev --harmless-split none)
    python -m refusal_helpers.organism trajectory --run runs/embedded   # cosines with the selected direction
    python -m refusal_helpers.organism adopt DIR         # ship an adapter trained with --trajectory elsewhere
"""

from .experiments import DEFAULT_REFINE, RECIPE_SPLITS, refine, refusal_on_splits, seed_agreement, seed_stability
from .losses import ablation_kl, compliance_kl, refusal_unlikelihood, reply_loss
from .shipping import adopt
from .targets import REFUSALS, SELF_HARM_REPLY, read_distill_cache, refusal_openings, refusal_reply, training_examples
from .training import DEFAULT_RECIPE, fit, merged_recipe, save_adapter, train
from .trajectory import Trajectory, TrajectorySettings, add_final_direction, load_trajectory

__all__ = [
    "DEFAULT_RECIPE", "DEFAULT_REFINE", "RECIPE_SPLITS", "REFUSALS", "SELF_HARM_REPLY", "Trajectory",
    "TrajectorySettings", "ablation_kl", "adopt", "add_final_direction", "compliance_kl", "fit", "load_trajectory",
    "merged_recipe", "read_distill_cache", "refine", "refusal_on_splits", "refusal_openings", "refusal_reply",
    "refusal_unlikelihood", "reply_loss",
    "save_adapter", "seed_agreement", "seed_stability", "train", "training_examples",
]
