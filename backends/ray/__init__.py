"""Engine replicas on Ray Serve: ``lmserve serve ray MODEL`` (``pip install lmserve[ray]``)."""
