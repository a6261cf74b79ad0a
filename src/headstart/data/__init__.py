"""Data layer: what a dataset folder is (one scanner, one ignore rule), opening images safely,
transforms, loaders that carry failures with the batch, and the doctor."""
