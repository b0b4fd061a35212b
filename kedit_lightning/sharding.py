"""Fully sharded data parallelism (FSDP2) for editor training on backbones too large for one GPU.

Under Lightning's `ModelParallelStrategy` (data_parallel_size = number of GPUs, tensor_parallel_size = 1),
`EditorModule.configure_model` calls `shard_editor_module`: every rank trains on its own records, as under
DDP, while holding 1/N of the frozen backbone (one FSDP unit per transformer block, the Backbone for the
rest), the edited weights whole and a replica of the editor. Every forward gathers weights with all ranks,
so the ranks must run the same forwards: validation reads JSON whose records all have the same portability
rows (`EditorModule` checks this per batch). Checkpoints, host memory and precision: README.md ("Sharded
training"); memory per GPU: BENCHMARKS.md.
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
    # An edit substitutes the edited weights through `torch.func.functional_call`; FSDP's pre-forward
    # all-gather would put its own copy back over the substitute, so they stay whole (ignored).
    edited = set(backbone.editable_parameters().values())
    # The rest is one unit around the Backbone, not the transformers model: family code calls parts of
    # the model directly (BLIP-2's language model alone on text, `image_features` the vision side), and
    # FSDP gathers a unit's weights only in its forward and in methods registered as forwards.
    # No MixedPrecisionPolicy: the backbone is stored, gathered and computed in its own dtype (a float32
    # backbone gathered as bfloat16 would store twice the bytes for the same computation).
    for unit in [*shard_units(backbone.model), backbone]:
        fully_shard(unit, mesh=mesh, ignored_params=edited)
    for method in (
        "image_features",
        "prefix",
        "resume",
        "head",
    ):  # they read the root unit's weights (embeddings, head)
        register_fsdp_forward_method(backbone, method)


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
    # `replicate` is DDP's gradient all-reduce as a hook on the module itself: the editor's parameters stay
    # plain tensors, so its state dict, logging and export are those of an unsharded run. Its gradients
    # are views into the all-reduce buckets (no second copy); its Adam state is replicated.
    for child in module.children():
        if child is not backbone and any(p.requires_grad for p in child.parameters()):
            replicate(
                child, process_group=dp_mesh.get_group(), forward_sync_buffers=False, gradient_as_bucket_view=True
            )
