"""volumed.serve"""
