"""Fully sharded data parallelism (FSDP2) for editor training on backbones too large for one GPU.

Under Lightning's `ModelParallelStrategy` (data_parallel_size = number of GPUs,
tensor_parallel_size = 1), `EditorModule.configure_model` calls `shard_editor_module(self,
self.device_mesh)`: every rank then trains on its own records, as under DDP, while holding only
its 1/N share of the frozen backbone.

- The backbone is sharded with `torch.distributed.fsdp.fully_shard`, one unit per transformer
  block (the outermost modules of the classes transformers lists in the model's
  `_no_split_modules`: LLaMA / OPT decoder layers, CLIP / EVA encoder layers, Q-Former blocks and
  attention), then the Backbone module itself for the rest (embeddings, LM head, norms,
  projector, query tokens). The rest is one unit around the Backbone, not around the transformers
  model, because family code calls parts of the model directly (BLIP-2 runs its language model
  alone on text-only inputs; `image_features` reads the vision side): FSDP gathers a unit's
  weights only in that unit's forward (and in methods registered as forwards).
  A unit's weights are all-gathered for its forward (and again for backward, where the edit's
  gradient flows through it) and freed right after.
- The edited weights stay whole on every rank (`ignored_params`): an edit replaces them with
  `torch.func.functional_call`, and FSDP's pre-forward all-gather would put its own copy back
  over the substitute. They are the few MLP matrices MEND edits, small next to the backbone.
- The editor (and any other child module with trainable parameters) is replicated with
  `torch.distributed._composable.replicate`, DDP's gradient all-reduce as a hook on the module
  itself: its parameters stay plain tensors, so its state dict, logging and export are what they
  are without sharding. Its gradients are views into DDP's all-reduce buckets (no second copy);
  its Adam state is replicated (3.7 GB for the 7B configs' editor).

Memory per GPU, N GPUs, backbone parameters P (of which P_e edited, P_r in the root unit), b bytes
per backbone weight (2 in bf16), editor parameters E (float32 weight, gradient, two Adam moments):
    b * (P - P_e - P_r) / N  +  b * (P_e + P_r)  +  2 * b * (largest unit)  +  16 * E  +  activations
where the largest unit is gathered twice over (the running one and the next, prefetched) and the
activations are those of one training step: each record's graph (the layers from the first
edited one up, four post-edit forwards, its edited weights) lives until the step's backward.
The root unit stays gathered from its first forward to the backward (FSDP2's default for the
root): about 0.6 GB for a 7B model's embeddings, LM head and projector.

Validation: every forward gathers weights with all ranks, so the ranks must run the same
forwards. Read validation data from JSON (the DistributedSampler pads ranks to the same number of
batches; streamed shards need not), and use records that all have the same portability rows
(E-VQA / E-IC, VLKEB eval.json, or `hops: [k]` with `require_port: true`): `EditorModule` checks
this per batch and stops with an error rather than hang.

Checkpoints: `save_distributed_checkpoint: false` writes one file that `kedit export` reads; to
build it, rank 0 gathers the backbone's state once per save before `on_save_checkpoint` drops it
(about 14 GB of host memory for a 7B model, for a moment). Every rank builds the whole backbone
on the CPU before sharding it (`configure_model`): host memory must hold one copy per GPU.

Precision: the frozen backbone is stored, gathered and computed in its own dtype (bfloat16 in
the MEND and SERAC 7B training configs, `BackboneSpec.dtype`) and training runs under `precision: bf16-mixed` (autocast;
the editor's weights, gradients and Adam state stay float32). No FSDP MixedPrecisionPolicy: a
float32 backbone gathered as bfloat16 would store twice the bytes for the same computation.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from kedit_lightning.backbones import Backbone

DATA_PARALLEL = "data_parallel"
"""The mesh dimension Lightning's ModelParallelStrategy names data parallelism (the one sharded over)."""


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `model`, each to be sharded as one unit: the outermost modules of
    the classes in its `_no_split_modules` (transformers' list of blocks that must stay whole),
    except one sharing a parameter with a module outside it (a tied weight belongs to one unit)."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    if not block_classes:
        raise ValueError(
            f"{type(model).__name__} declares no `_no_split_modules`: there is no transformer block to shard by"
        )
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    blocks: dict[str, nn.Module] = {}
    for name, module in model.named_modules():  # parents before their children
        if type(module).__name__ not in block_classes or any(name.startswith(f"{block}.") for block in blocks):
            continue
        if all(other.startswith(f"{name}.") for param in module.parameters() for other in names_of[id(param)]):
            blocks[name] = module
    return list(blocks.values())


def shard_backbone(backbone: Backbone, mesh: DeviceMesh) -> None:
    """Shard `backbone` over the 1-d `mesh`: one unit per transformer block, then the backbone
    itself for the rest, with the edited weights left whole."""
    edited = set(backbone.editable_parameters().values())
    for unit in [*shard_units(backbone.model), backbone]:
        fully_shard(unit, mesh=mesh, ignored_params=edited)
    register_fsdp_forward_method(backbone, "image_features")


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel dimension of Lightning's (data_parallel, tensor_parallel) mesh; refuses
    tensor parallelism, which nothing here implements (ranks of one TP group would see the same records)."""
    names = mesh.mesh_dim_names or ()
    if DATA_PARALLEL not in names:
        raise ValueError(
            f"expected a device mesh with a {DATA_PARALLEL!r} dimension (Lightning's ModelParallelStrategy), "
            f"got dimensions {names}"
        )
    tensor_parallel = mesh.size() // mesh[DATA_PARALLEL].size()
    if tensor_parallel != 1:
        raise ValueError(
            "sharded editor training shards the backbone over data-parallel ranks only; "
            f"got tensor_parallel_size={tensor_parallel}. Set `trainer.strategy.init_args.data_parallel_size` "
            "to the number of GPUs and `tensor_parallel_size: 1`"
        )
    return mesh[DATA_PARALLEL]


def shard_editor_module(module: nn.Module, mesh: DeviceMesh) -> None:
    """Shard `module.backbone` and replicate every other child with trainable parameters.

    `module` is an EditorModule after its `configure_model` built the backbone and the editor;
    `mesh` is Lightning's `self.device_mesh`. Calling it again on a sharded module does nothing
    (Lightning calls `configure_model` once per fit / validate / test).
    """
    backbone: Backbone = module.backbone
    if isinstance(backbone, FSDPModule):
        return
    dp_mesh = data_parallel_mesh(mesh)
    shard_backbone(backbone, dp_mesh)
    for child in module.children():
        if child is not backbone and any(p.requires_grad for p in child.parameters()):
            replicate(
                child, process_group=dp_mesh.get_group(), forward_sync_buffers=False, gradient_as_bucket_view=True
            )
