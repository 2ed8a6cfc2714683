"""Sample-quality evaluation: the FID Inception network, FID / IS / precision-recall, --mode=fid."""
