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
