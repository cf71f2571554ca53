"""Names of the features that the feature layer produces and the models consume.

One place for them, so the Feast definitions, the training data and the serving path agree
on every name. A training frame (``components.features.training_data.build_training_data``) has one row
per event with the event's own columns, its context, and each feature as it was known
strictly before the event's timestamp (point in time).
"""

from __future__ import annotations

# Event types that count as a positive interaction (the retriever's training signal).
POSITIVE_EVENT_TYPES = ("click", "view", "add_to_cart", "purchase", "like", "rating")

# The ranking signature for one user against N candidates: user and context inputs [1],
# candidate inputs [N] (the user side is computed once). The trainer writes it, push
# re-exports it, the gateway calls it.
RANK_CANDIDATES_SIGNATURE = "rank_candidates"

# feature view "user_profile" (batch, from validated users)
USER_PROFILE_FEATURES = ("age_bucket", "country", "signup_source")

# feature view "item_attributes" (batch, from validated items)
ITEM_ATTRIBUTE_FEATURES = ("category", "title", "description", "in_stock")


def user_engagement_features(windows_days: list[int]) -> list[str]:
    """feature view "user_engagement": counts over trailing windows (Int64 / Float32)."""
    return [
        name
        for w in windows_days
        for name in (f"user_events_{w}d", f"user_positives_{w}d", f"user_purchases_{w}d")
    ]


def item_popularity_features(windows_days: list[int]) -> list[str]:
    """feature view "item_popularity": counts and click-through over trailing windows."""
    return [
        name
        for w in windows_days
        for name in (f"item_impressions_{w}d", f"item_positives_{w}d", f"item_ctr_{w}d")
    ]


# feature view "user_recent_items" (push source: updated by every accepted event)
# recent_items: the user's last positive item ids, newest first, joined by a space.
# recent_item_times: aligned with recent_items, the epoch seconds of each item's latest
#   positive event, joined by a space ("-1": not known; see recsys.item_ages).
# session_items: item ids of the user's current session, newest first, joined by a space.
RECENT_ITEM_FEATURES = ("recent_items", "recent_item_times", "session_id", "session_items")

# Feature services: the models fetch by service name, never by a loose list.
RETRIEVER_SERVICE = "retriever_v1"
RANKER_SERVICE = "ranker_v1"

# The retriever's candidate tower (item content and popularity), embedded offline at index
# build: a service of its own so that a request for one user never reads item rows.
RETRIEVER_CANDIDATE_SERVICE = "retriever_candidates_v1"

# Values a training or serving row gets where a feature has no value yet (a new user, an item
# without impressions, an event before the first snapshot): counts 0, rates 0.0, text "",
# stock False. Text "" rather than "unknown" keeps a missing value apart from a known one.
FEATURE_DEFAULTS_BY_KIND = {"count": 0, "rate": 0.0, "text": "", "flag": False}
