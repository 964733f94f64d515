"""Names of the batch features that the data side writes and the model side reads.

The one contract across the wall between ``user_llm/data`` and the model modules: neither side
imports the other, both import these names.
"""

# Every feature whose name starts with this is a user-history array [b, L, ...] (the encoder's
# input; ``models.user_features`` hands them to it, the converters pass them through).
USER_PREFIX = "user_"
# Each example's next-item id for User-LLM's item head: the encoder vocabulary id on next-item
# examples, padding (0) on every other task's, so a mixture trains the head on next-item
# questions alone.
ITEM_TARGET = "item_target_id"
# Encoder vocabulary ids below this are padding (0) and out-of-vocabulary (1): an
# ``ITEM_TARGET`` below it means "no next item to learn" (``data.histories.NUM_RESERVED``).
FIRST_ITEM_ID = 2
