"""Cross-layer attention reuse (Reuse Transformers): which heads reuse the previous layer's
attention (:mod:`.plan`), and plans proposed from measured similarity (:mod:`.similarity`)."""

from .plan import ReusePlan, reuse_savings
from .similarity import LayerAttention, PairSimilarity, SimilarityReport, attention_similarity, suggest_reuse

__all__ = ["LayerAttention", "PairSimilarity", "ReusePlan", "SimilarityReport", "attention_similarity",
           "reuse_savings", "suggest_reuse"]
