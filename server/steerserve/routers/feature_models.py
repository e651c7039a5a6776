"""Request and response models of the feature-analysis routes (features.py), as /openapi.json
publishes them.

Bounds whose refusal has its own error code (`top_k` -> invalid_top_k, a layer that is not
loaded, `watch` indices past d_sae) are checked by the handler and only described here; what the
forwarded completion validates (`steering`) is passed through as sent and described by the
steering schema (steering/schema.py), so its errors name `steering.features[i]...` exactly as on
chat completions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, StrictInt, StrictStr

from steerserve.limits import MAX_TOP_K
from steerserve.routers.route import integer_query
from steerserve.steering.schema import Steering

MAX_NEXT_TOKEN_LOGPROBS = 20  # vLLM's default --max-logprobs
SEARCH_LIMIT, MAX_SEARCH_LIMIT = 20, 100
MAX_SEARCH_OFFSET = 10_000  # token search ranks features on the workers: bounded work per request


class InspectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    messages: list[dict[str, Any]] | None = Field(None, description="a chat, rendered as chat completions render "
                                                                    "it; give exactly one of messages or prompt")
    prompt: StrictStr | None = Field(None, description="a text, tokenized as is")
    add_generation_prompt: StrictBool = True
    layers: list[StrictInt] | None = Field(None, description="loaded SAE layers to inspect (default: all)",
                                           json_schema_extra={"minItems": 1})
    top_k: StrictInt = Field(10, json_schema_extra={"minimum": 1, "maximum": MAX_TOP_K})
    steering: Annotated[Any, PlainValidator(lambda value: value, json_schema_input_type=Steering | None)] = None
    quality: StrictBool = Field(False, description="also report how well each layer's SAE reconstructs this text")
    splice: StrictBool = Field(False, description="run the text with each inspected layer replaced by its SAE's "
                                                  "reconstruction")
    watch: list[StrictInt] = Field([], description="feature indices reported at every token of every inspected "
                                                   "layer", json_schema_extra={"maxItems": MAX_TOP_K})
    next_token_logprobs: StrictInt = Field(0, ge=0, le=MAX_NEXT_TOKEN_LOGPROBS, description=(
        "the top-k next-token log-probabilities at every position (eval's KL); implies `nll`"))


class SearchQuery(BaseModel):
    """Exactly one of `q` (label text) or `token` (a single token the features promote)."""

    q: str | None = None
    token: str | None = None
    layer: integer_query() = None
    limit: integer_query(1, MAX_SEARCH_LIMIT, SEARCH_LIMIT) = None
    offset: integer_query(0, MAX_SEARCH_OFFSET, 0) = None


class FeatureActivation(BaseModel):
    index: int
    activation: float


class InspectedToken(BaseModel):
    position: int
    token_id: int
    token: str
    special: bool
    features: dict[str, list[FeatureActivation]]  # by layer, its top_k
    watched: dict[str, list[FeatureActivation]] | None = None  # by layer, with `watch`


class AggregateFeature(BaseModel):
    index: int
    max_activation: float
    mean_activation: float
    count: int


class LayerAggregate(BaseModel):
    """Over the input's non-special tokens."""

    num_tokens: int
    by_max: list[AggregateFeature]
    by_mean: list[AggregateFeature]


class LayerQuality(BaseModel):
    tokens: int
    fvu: float | None
    l0: float | None
    features_fired: int
    dead_fraction: float
    sums: dict[str, Any]  # the raw sums, which add up over requests (analysis/sae_quality.py)


class FeatureInspection(BaseModel):
    object: Literal["feature_inspection"]
    model: str
    layers: list[int]
    top_k: int
    steering: dict[str, Any] | None  # the normalised spec, as chat completions echo it
    tokens: list[InspectedToken]
    aggregate: dict[str, LayerAggregate]
    nll: float | None = None  # with `quality` or `next_token_logprobs`
    next_token_logprobs: list[dict[str, float]] | None = None
    quality: dict[str, LayerQuality] | None = None


class FeatureHit(BaseModel):
    layer: int
    index: int
    logit: float | None = None  # token search: the token's logit through the feature's decoder direction
    label: str | None
    description: str | None
    score: float | None = None  # label search: how well the label matches (0.5: found in top examples)
    token: str | None = None  # token search
    examples_matched: int | None = None  # with --feature-dashboards: times the text is in the top examples
    explanation: str | None = None  # with --feature-dashboards: the explanation, when the text is in it


class FeatureSearchPage(BaseModel):
    object: Literal["list"]
    data: list[FeatureHit]
    total: int
    limit: int
    offset: int
    has_more: bool


class LensToken(BaseModel):
    token_id: int
    token: str
    logit: float


class LogitLens(BaseModel):
    promoted: list[LensToken]
    suppressed: list[LensToken]


class Histogram(BaseModel):
    edges: list[float]  # log-spaced bin edges, one more than counts
    counts: list[int]


class TopExample(BaseModel):
    tokens: list[str]  # a window of tokens around the top activation
    activations: list[float]  # the feature's activation at each


class FeatureExplanation(BaseModel):
    text: str  # one line from the explainer model (steerserve dashboards --explain)
    model: str
    detection_score: float | None  # 0..1, 0.5 = chance; see README "Explanations"
    held_out: int  # held-out top examples scored
    random: int  # random contexts scored


class Feature(BaseModel):
    object: Literal["feature"]
    layer: int
    index: int
    d_model: int
    decoder_norm: float
    encoder_norm: float
    encoder_decoder_cosine: float
    logit_lens: LogitLens
    label: str | None
    description: str | None
    # with --feature-dashboards (steerserve dashboards), for a layer the file covers:
    firing_rate: float | None = None
    mean_activation: float | None = None  # over the tokens it fires on
    max_activation: float | None = None
    histogram: Histogram | None = None
    top_examples: list[TopExample] | None = None
    explanation: FeatureExplanation | None = None
