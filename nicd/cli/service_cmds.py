"""placeholder until the service commands land"""
