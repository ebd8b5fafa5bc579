from arrival.verify.proxy import FaultProxy as FaultProxy  # moved into the package
