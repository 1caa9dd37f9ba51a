"""The Open Inference Protocol (KServe v2) REST surface: schemas, datatypes and tensor codec."""
