"""`--strategy auto`: measure the data and this machine, plan candidates with a cost model, search
them by successive halving on an inner split of the training images, train the winner within the
budget. The validation split is used once, on the final model."""
