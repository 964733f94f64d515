"""Mesh construction and the logical-axis rules (8 simulated devices in a subprocess)."""

from __future__ import annotations

import json
import textwrap

import flax.linen as nn
import pytest
from conftest import run_module

from user_llm import partitioning


def test_rules_map_weights_and_activations_as_t5x_does():
    rules = partitioning.standard_logical_axis_rules()
    assert tuple(nn.logical_to_mesh_axes(("embed", "mlp"), rules)) == (None, "model")
    assert tuple(nn.logical_to_mesh_axes(("batch", "length", "embed"), rules)) == (
        "data",
        None,
        None,
    )
    fsdp = partitioning.standard_logical_axis_rules(shard_params_over_data=True)
    # Weights split their embed dimension over data; activations keep batch on data.
    assert tuple(nn.logical_to_mesh_axes(("embed", "mlp"), fsdp)) == ("data", "model")
    assert tuple(nn.logical_to_mesh_axes(("batch", "length", "embed"), fsdp)) == (
        "data",
        None,
        None,
    )


def test_mesh_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs 4 devices"):
        partitioning.create_mesh((2, 2))  # one CPU device here
    with pytest.raises(ValueError, match="At most one -1"):
        partitioning.create_mesh((-1, -1))
    with pytest.raises(ValueError, match="rank"):
        partitioning.create_mesh((1,), ("data", "model"))


SCRIPT = textwrap.dedent(
    """
    import json
    import flax.linen as nn, jax, jax.numpy as jnp
    from user_llm import partitioning, testing
    from user_llm.decoder import Decoder
    mesh = partitioning.create_mesh((-1, 4))
    cfg = testing.tiny_decoder_config(num_layers=1)
    boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0),
                                                     jnp.zeros((2, 4), jnp.int32)))
    out = {}
    for fsdp in (False, True):
        rules = partitioning.standard_logical_axis_rules(shard_params_over_data=fsdp)
        sh = partitioning.logical_shardings(boxed, mesh, rules)["params"]["layers_0"]
        out[str(fsdp)] = {
            "wi_0": str(sh["mlp"]["wi_0"]["kernel"].spec),
            "key": str(sh["self_attention"]["key"]["kernel"].spec),
        }
    out["mesh"] = dict(mesh.shape)
    print(json.dumps(out))
    """
)


def test_shardings_on_8_devices_fsdp_and_uneven_heads(tmp_path):
    script = tmp_path / "mesh.py"
    script.write_text(SCRIPT)
    proc = run_module(
        [str(script)], env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mesh"] == {"data": 2, "model": 4}  # -1 took the remaining devices
    assert out["False"]["wi_0"] == "P(None, 'model')"
    assert out["True"]["wi_0"] == "P('data', 'model')"
    # 2 KV heads cannot split over 4 model devices: that dimension is replicated.
    assert out["False"]["key"] == "P(None, None, None)"
