"""Active-parameter fraction implied by the zero pattern of the readout's input features."""

from __future__ import annotations


def active_parameter_fraction(total_params: int, readout_input_weight_shape: tuple[int, int],
                              nonzero_features_per_token: float) -> dict:
    """Count the parameters a token uses when zero features skip their readout weight columns.

    The readout's first linear layer has weight (hidden, features), and column j only
    multiplies feature j, so a token whose feature j is exactly 0 never reads that column.
    A token with k nonzero features therefore leaves hidden * (features - k) weights idle:

        active = total_params - hidden * (features - nonzero_features_per_token)

    Every other parameter counts as active for every token: the whole embedding table
    (the usual convention, although a token reads one row), the backbone, that layer's
    bias and the rest of the readout. `nonzero_features_per_token` is a mean over tokens,
    so `active` is a mean too and may be fractional.

    Returns total, active, active_fraction, reduction (1 - active_fraction) and
    readout_input_active_fraction (nonzero features / features).
    """
    hidden, features = readout_input_weight_shape
    if hidden < 1 or features < 1:
        raise ValueError(f"readout_input_weight_shape must be (hidden, features) with both positive, got {readout_input_weight_shape}")
    if total_params < hidden * features:
        raise ValueError(f"total_params {total_params} is smaller than the readout input weight alone ({hidden} x {features})")
    if not 0 <= nonzero_features_per_token <= features:
        raise ValueError(f"nonzero_features_per_token must be between 0 and {features}, got {nonzero_features_per_token}")

    active = total_params - hidden * (features - nonzero_features_per_token)
    active_fraction = active / total_params
    return {
        "total": total_params,
        "active": active,
        "active_fraction": active_fraction,
        "reduction": 1.0 - active_fraction,
        "readout_input_active_fraction": nonzero_features_per_token / features,
    }


def matmul_active_parameters(total_params: int, matmuls: list[dict]) -> dict:
    """Count the parameters a token uses when each listed matmul skips the weight columns of zero inputs.

    Each matmul is {"name", "out_features", "in_features", "nonzero_inputs", "counted"}:
    nonzero_inputs is the mean count of nonzero input values per token, measured at
    evaluation. A matmul with counted False (the tied LM head, whose weight the embedding
    table already counts as active) is listed with its active column fraction but leaves
    the parameter count unchanged.

    Returns total, active, active_fraction, reduction and per matmul its
    active_column_fraction and idle_weights.
    """
    idle_total = 0.0
    rows = []
    for matmul in matmuls:
        in_features, nonzero = matmul["in_features"], matmul["nonzero_inputs"]
        if not 0 <= nonzero <= in_features:
            raise ValueError(f"{matmul['name']}: nonzero_inputs must be between 0 and {in_features}, got {nonzero}")
        idle = matmul["out_features"] * (in_features - nonzero)
        if matmul.get("counted", True):
            idle_total += idle
        rows.append({"name": matmul["name"], "weight_shape": [matmul["out_features"], in_features],
                     "active_column_fraction": nonzero / in_features, "idle_weights": idle,
                     "counted": matmul.get("counted", True)})
    if idle_total > total_params:
        raise ValueError(f"idle weights {idle_total} exceed the {total_params} parameters of the model")
    active = total_params - idle_total
    return {"total": total_params, "active": active, "active_fraction": active / total_params,
            "reduction": idle_total / total_params, "matmuls": rows}
