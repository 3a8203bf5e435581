"""CRIU's image schemas as Python classes: install/node.sh generates `*_pb2.py` here with protoc
from the images/*.proto of the CRIU it builds (a build product: never committed, never edited).
Only shim/drivers/criu_decode.py imports them."""
