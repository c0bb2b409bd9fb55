"""The one runtime path: a per-model runner (packed weights, captured graphs), the batch engine every
face decodes through, and the text stream every face reads."""
