"""Deployment: a trained model in use, without torch.

- ``onnx_model.OnnxEmbedder``: flip-test, L2-normalised embeddings of aligned crops with onnxruntime.
- ``metadata``: what `dcq export` writes into the ONNX file (input size, normalisation, colour
  order, embedding size, encoder) and how a model is fingerprinted.
- ``embed_job``: `dcq embed --onnx` over folders of images, in resumable ``.npy`` shards.
- ``gallery``: an enrolled set of embeddings, searched exactly (numpy / faiss) or approximately (faiss).
- ``cli``: `dcq align`, `dcq gallery`.
"""
