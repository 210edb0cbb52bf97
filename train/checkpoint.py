"""Checkpoints through orbax's CheckpointManager: DIR/checkpoints/<step>/{params,opt_state,data}.

'params' and 'opt_state' are sharded pytrees (each host writes its shards; restoring onto abstract
arrays with other shardings reshards them, so a run saved on one mesh resumes on another);
'data' is the input iterator's state as JSON. Evaluation and sampling restore 'params' alone.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

ITEMS = ('params', 'opt_state', 'data')


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params, opt_state, data_state: dict) -> None:
    """Saves in the background; `wait` blocks until it is on disk."""
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_params, abstract_opt_state=None):
    """(params, opt_state, data state) at `step`, laid out as the abstract trees say
    (jax.ShapeDtypeStruct leaves with shardings). Without `abstract_opt_state`, params only."""
    args = {'params': ocp.args.StandardRestore(abstract_params)}
    if abstract_opt_state is not None:
      args['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
      args['data'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored['params'], restored.get('opt_state'), restored.get('data')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (concrete or abstract) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
