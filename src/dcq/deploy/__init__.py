"""Deployment: a trained model in use, without torch.

- ``onnx_model.OnnxEmbedder``: flip-test, L2-normalised embeddings of aligned crops with onnxruntime.
- ``metadata``: what `dcq export` writes into the ONNX file (input size, normalisation, colour
  order, embedding size, encoder) and how a model is fingerprinted.
- ``embed_job``: `dcq embed --onnx` over folders of images, in resumable ``.npy`` shards.
- ``photos``: one file decoded and aligned (or resized), or the reason it cannot be embedded.
- ``gallery`` / ``gallery_store``: enrolled embeddings, searched exactly (numpy / faiss) or
  approximately (faiss IVF, IVF-PQ, HNSW), and the one-file format they are kept in.
- ``detect`` (MTCNN: faces and their 5 landmarks), ``mtcnn_nets`` (its networks in torch, for the
  one-time ONNX export), ``mtcnn_weights`` (the shipped weights and the ONNX cache), ``orientation``
  (EXIF orientation of photos).
- ``align_cli``, ``detect_cli``, ``embed_cli``, ``gallery_cli``: `dcq align`, `dcq detect`,
  `dcq embed --onnx`, `dcq gallery`.
"""
