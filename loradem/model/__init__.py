"""The model layer every stage stands on: the base, the in-memory weighted model (soup), generation and loss, layer naming."""
