"""`l2`: Euclidean norm of the unit's coupled group, sqrt(sum w^2) over all its weights."""

from loram.publisher.importance import LayerScores, group_scores
from loram.shared.architectures import Shape


def scores(model, layers: range, calib, seed: int) -> dict[int, LayerScores]:
    shape = Shape.of(model.config)
    decoder = model.get_decoder().layers
    out = {}
    for i in layers:
        squared = group_scores(decoder[i], shape, lambda p: p.detach().double().square())
        out[i] = LayerScores(squared.kv.sqrt(), squared.mlp.sqrt())
    return out
