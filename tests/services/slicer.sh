#!/bin/sh
# A stand-in slicer for sonde orders' tests, run by order_shop.py as a program of its
# own: "slices" for 0.2 s; a model named "broken" fails with exit code 1.
sleep 0.2
[ "$1" != broken ]
