"""The model and the contracts of every stage: schema, errors, manifests, the output-folder
policy, the Example format, tf.data input, the network, training, export, and the
TF Serving-compatible server (`serving/`). Never imports `beam_jobs`."""
