"""Weights on disk: self-describing bundles (`bundle`), explicit converters from the published files
(`convert`), the load policy (device, dtype, quantisation: `policy`), weight-only int8/int4
(`weight_only`), and parameter/memory summaries (`summary`)."""
