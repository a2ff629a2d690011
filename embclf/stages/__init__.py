"""One module per stage (``stage=autoencode`` / ``stage=classify``); ``stage=all`` runs both in turn."""
