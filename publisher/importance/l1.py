"""`l1`: sum of |w| over every weight of the unit's coupled group (as in LLM-Pruner)."""

from loram.publisher.importance import LayerScores, group_scores
from loram.shared.architectures import Shape


def scores(model, layers: range, calib, seed: int) -> dict[int, LayerScores]:
    shape = Shape.of(model.config)
    decoder = model.get_decoder().layers
    return {i: group_scores(decoder[i], shape, lambda p: p.detach().abs()) for i in layers}
