"""Several trained models made into one, after training (docs/model_fusion.md, docs/callbacks_swa_soup.md):

* :mod:`~lightning_modules.fusion.ensemble`: ``Ensemble``, the members' outputs combined (``--model Ensemble``);
* :mod:`~lightning_modules.fusion.soup`: the greedy model soup, their weights averaged;
* :mod:`~lightning_modules.fusion.soup_selection`: the soup chosen by validation on held-out images and
  reported (``labelwise soup``, ``python benchmarks/soup.py``).

Any module's checkpoints, of no method family: fusion imports only core.
"""

from lightning_modules.fusion.ensemble import Ensemble, load_member
from lightning_modules.fusion.soup import average_state_dicts, eval_state_dict, greedy_soup, save_soup
from lightning_modules.fusion.soup_selection import run_soup, soup_from_checkpoints

__all__ = ["Ensemble", "load_member", "average_state_dicts", "eval_state_dict", "greedy_soup", "save_soup",
           "run_soup", "soup_from_checkpoints"]
