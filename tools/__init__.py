"""Tools run on demand beside the pipeline: reports, the docs renderer, the hyperparameter search and
its workers, and the local test servers (S3, PostgreSQL). The stages never import them."""
